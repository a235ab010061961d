"""Data: ECG segments from disk to tensors on the device (public/dataset.py is its face).

    segments.py      Segments, LengthPolicy, LabelSpec, the parse cache
    txt_format.py    a folder of S<subject>-<RHYTHM>-<index>.txt files (the original's)
    csv_format.py    a CSV file, one segment per row
    numpy_format.py  a .npz / .npy file
    loading.py       LOADERS, load_data, encode_labels, split_by_subject, split_by_folds
    prepare.py       prepare_data: a run's data loaded, split, on the device (TrialData)
"""
