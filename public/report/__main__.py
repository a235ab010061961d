"""`python -m public.report stage1|stage2 ...`: public/report/main.py."""
import sys

from public.report.main import main

sys.exit(main())
