"""Report: one HTML page per stage, made only from what a search left on disk.

    plots.py    the figures (matplotlib)
    reading.py  the results tables and result.json files, for the pages
    pages.py    both pages (write_stage_one_report, write_stage_two_report)
    main.py     the command line (`python -m public.report`, `train_*.py --report`)
"""
