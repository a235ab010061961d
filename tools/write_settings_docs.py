"""Write params.py (the shipped defaults) and docs/settings.md from the settings table.

    python tools/write_settings_docs.py           # after changing public/core/settings.py

The table in public/core/settings.py is the one place a setting's default, rule and doc
live; tests/test_settings_table.py fails when these two files do not match it.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from public.core.settings import params_text, settings_markdown  # noqa: E402


def main():
    for path, text in (('params.py', params_text()), ('docs/settings.md', settings_markdown())):
        with open(os.path.join(ROOT, path), 'w') as f:
            f.write(text)
        print(f"wrote {path}")


if __name__ == '__main__':
    main()
