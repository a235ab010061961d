"""Results: what a search records and where (table, store, files, keys); it never runs a
trial itself.

    table.py   ResultsTable (the append-only CSV tables), STAGE1_COLUMNS, STAGE2_COLUMNS
    store.py   crash safety: recover_folders, RunLock, check_writable, clean_scratch
    files.py   the files of a result folder: write_result_files, write_info, read_info
    keys.py    settings_key, lr_key, best_rank, trial_row, same_trial
"""
