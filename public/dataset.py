"""The data loading API, where users and tests look for it (the code is in public/data/).

    segments = load_data('ttdata/train', settings)            # any format, parsed once, cached
    y = encode_labels(segments, settings, 'ttdata/train')
"""
from public.data.loading import (LOADERS, Loader, detect_format, encode_labels, label_spec,
                                 length_policy, load_data, num_classes, split_by_folds,
                                 split_by_subject, with_label_lines)
from public.data.segments import (DataError, LabelSpec, LengthPolicy, LoadOptions, Segments,
                                  cache_entry, checksums, excerpt, load_cached, save_cached)
from public.data.txt_format import load_folder, parse_filename

__all__ = ['LOADERS', 'Loader', 'detect_format', 'encode_labels', 'label_spec', 'length_policy',
           'load_data', 'num_classes', 'split_by_folds', 'split_by_subject', 'with_label_lines',
           'DataError', 'LabelSpec', 'LengthPolicy', 'LoadOptions', 'Segments', 'cache_entry',
           'checksums', 'excerpt', 'load_cached', 'save_cached', 'load_folder', 'parse_filename']
