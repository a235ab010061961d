"""Compatibility re-export: the CSV and NumPy loaders, which now live in their own modules.

    public/format_csv.py     load_csv (the Tianchi heartbeat / PTB-XL CSV)
    public/format_numpy.py   load_numpy (.npz / .npy)

New code imports from those modules, or calls public.dataset.load_data (see the layout in
public/dataset.py's docstring). No logic lives here.
"""
from public.format_csv import load_csv  # noqa: F401
from public.format_numpy import load_numpy  # noqa: F401
