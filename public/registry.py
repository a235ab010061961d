"""Model registry: a model registers itself next to its definition with @register_model.

`model_classes()` lists the registered classes in registration order (the order stage one
trains them). A duplicate name is an error; an unknown name is an error that lists the
known ones. Every registered class is constructed as
`Model(input_size=..., in_channels=..., num_classes=...)` and takes input of shape
(N, in_channels, input_size, 1), the original ATML layout.
"""

_REGISTRY = {}


def register_model(cls):
    """Class decorator: add `cls` to the registry under its class name."""
    name = cls.__name__
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"model name {name!r} is already registered "
                         f"(by {_REGISTRY[name].__module__}); model names must be unique")
    _REGISTRY[name] = cls
    return cls


def model_classes():
    """Registered model classes, in registration order."""
    return list(_REGISTRY.values())


def get_model_class(name):
    """The registered class called `name`; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: "
                       f"{', '.join(_REGISTRY) or '(none)'}") from None
