"""ATML: two-stage AutoML for small 1-D signal classifiers (ECG AF detection first).

Stage one (train_multi.py) searches registered models x learning rates; stage two
(train_final.py) scales the chosen architecture's widths until metric and size targets meet.
"""
