"""Core: what every other wing may use and nothing else imports below it.

    errors.py      ATMLError and its kinds (SettingsError, DataError, DiskFullError, ...)
    settings.py    params.py loading, KEY=VALUE overrides, the rules table, validation
    interrupts.py  SIGINT/SIGTERM as KeyboardInterrupt, held inside critical sections
    atomic.py      whole-or-nothing writes: write_atomic, replacing, replace_folder, durable
"""
