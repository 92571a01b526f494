"""Parts from outside pyrovae: priors, likelihoods, posteriors and networks added by name.

Two ways in, both reaching configs, the command line and saved runs:

- **Entry points** (installed packages). A package declares, in its ``pyproject.toml``::

      [project.entry-points."pyrovae.priors"]
      logistic = "my_package.priors:LogisticPrior"

  and ``--prior logistic`` works wherever the package is installed. The groups are
  ``pyrovae.priors``, ``pyrovae.likelihoods``, ``pyrovae.posteriors`` and ``pyrovae.networks``.
- **Plugin modules** (any importable module, including a file in the current folder): the module
  adds its parts to the registries when imported, e.g. ``PRIORS["logistic"] = LogisticPrior``, and
  is named in ``model.plugins`` (``--plugin my_module`` on the command line). The name is saved with
  the run's config, so loading the run imports the module again.

A part's options are its constructor's annotated keyword parameters. ``pyrovae.parts.resolve_parts``
checks each value against its annotation (when the model is built, and through ``check_names``
before a run claims its folder) and hands an integer given for a ``float`` option (``scale=2``) to
the part as a float. The part checks ranges itself, in ``__init__``: ``pyrovae.config.option_int``,
``option_number`` and ``option_widths`` raise ``pyrovae.config.OptionError``, which ``build_vae``
reports naming the field (``model.prior_options.scale must be a positive finite number, got -1.0``);
any other ``ValueError`` or ``TypeError`` is reported with the part's name and options.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points

__all__ = ["GROUPS", "PluginError", "load_plugins"]

#: Entry-point group -> (module, registry name) it adds to.
GROUPS = {
    "pyrovae.priors": ("pyrovae.priors", "PRIORS"),
    "pyrovae.likelihoods": ("pyrovae.likelihoods", "LIKELIHOODS"),
    "pyrovae.posteriors": ("pyrovae.posteriors", "POSTERIORS"),
    "pyrovae.networks": ("pyrovae.networks", "NETWORKS"),
}
_entry_points_loaded = False
_modules_loaded: set[str] = set()


class PluginError(ImportError):
    """A plugin module or entry point could not be loaded."""


def load_plugins(modules=()) -> None:
    """Add the installed entry points (once per process) and import ``modules`` (each once)."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for group, (module, name) in GROUPS.items():
            registry = getattr(importlib.import_module(module), name)
            for ep in entry_points(group=group):
                if ep.name in registry:
                    continue  # pyrovae's own names come first
                try:
                    registry[ep.name] = ep.load()
                except Exception as e:
                    raise PluginError(f"the {group} entry point {ep.name!r} ({ep.value}) could not be loaded: "
                                      f"{type(e).__name__}: {e}. Reinstall or remove the package that declares it")
    for module in modules:
        if module not in _modules_loaded:
            _import(module)
            _modules_loaded.add(module)


def _import(module: str) -> None:
    try:
        importlib.import_module(module)
        return
    except ModuleNotFoundError as e:
        missing = e.name == module.split(".")[0]
        if not missing:
            raise PluginError(f"the plugin module {module!r} could not be imported: {e}") from None
    except Exception as e:
        raise PluginError(f"the plugin module {module!r} failed on import: {type(e).__name__}: {e}") from None
    if os.getcwd() not in sys.path:  # a module file in the current folder, as ``python -m`` would find it
        sys.path.insert(0, os.getcwd())
        try:
            importlib.import_module(module)
            return
        except ModuleNotFoundError:
            sys.path.remove(os.getcwd())
        except Exception as e:
            raise PluginError(f"the plugin module {module!r} failed on import: {type(e).__name__}: {e}") from None
    raise PluginError(f"no plugin module {module!r} was found: install it, put it on PYTHONPATH, or run from the "
                      "folder that holds it")
