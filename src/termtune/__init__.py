"""termtune: teach a language model a field's terminology and ship it to Amazon Bedrock Custom Model Import.

    import termtune as tt

    cfg = tt.load_config("configs/demo.yaml", {"run.dir": "runs/nb"})
    tt.run(cfg)

The functions (documented in docs/api.md, defined in termtune.api) are imported on first use,
so `import termtune` and `termtune --help` stay fast.
"""

import sys
import types

__version__ = "0.1.0"

API = ("load_config", "prepare_data", "inspect_data", "train", "evaluate", "export", "validate", "deploy",
       "invoke", "cleanup", "run", "write_report")
__all__ = [*API, "__version__"]


def __getattr__(name: str) -> object:
    if name in API:
        from importlib import import_module

        return getattr(import_module("termtune.api"), name)
    raise AttributeError(f"module 'termtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API})


class _Package(types.ModuleType):
    """`termtune.train` is the API function, although a stage module of that name exists.

    Importing a submodule binds it as an attribute of its package, which would replace the
    function (termtune.train, evaluate, export, validate) with the module once any code
    imported it. The package keeps the functions: inside termtune, a stage module is imported
    as `from termtune.train import train`, never as `from termtune import train`.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
