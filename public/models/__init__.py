"""Models: the registry and the architectures (public/model.py and public/ss_model.py, the
files users edit, build on these).

    registry.py  register_model, model_classes, get_model_class, import_user_module
    blocks.py    AFNetBody, SqueezeExcite, afnet_config, to_1d
    seed.py      the seed systems' models (SEResNet1d, HeartbeatCNN)
    small.py     the <= 20 KB architectures (SepNet)
"""
