"""lora_rewrite: the `runlora` torch.compile backend for PEFT LoRA training.

    model = torch.compile(peft_model, backend="runlora")   # no import of this package needed

Public surface: `runlora` (the backend callable), `explain` (what it did to a model, as a report),
`RunLoraOptions`, the variant lists `FORWARDS` / `BACKWARDS`, and `register()`.
"""

from lora_rewrite.backend import BACKEND_NAME, register, runlora
from lora_rewrite.explain import explain
from lora_rewrite.options import RunLoraOptions
from lora_rewrite.variants import BACKWARDS, FORWARDS

__version__ = "0.1.0"
__all__ = ["runlora", "explain", "register", "RunLoraOptions", "FORWARDS", "BACKWARDS", "__version__"]


def _installed_entry_point() -> bool:
    try:
        from importlib.metadata import entry_points

        return BACKEND_NAME in entry_points(group="torch_dynamo_backends").names
    except Exception:
        return False


try:  # accelerate (Hugging Face Trainer) checks backend names against its own list: add "runlora"
    import _lora_rewrite_startup

    _lora_rewrite_startup.install()
except ImportError:
    pass

# DoRA layers trace as one graph (lora_rewrite/traceable_peft.py): stand-ins for PEFT's untraceable calls.
try:
    from lora_rewrite import traceable_peft

    traceable_peft.install()
except Exception:   # never break loading the backend: DoRA layers then break the graph, as without it
    pass

# Installed: Dynamo loads the backend through the entry point, which must find the name unregistered
# (it registers it itself). From a source checkout there is no entry point: register here.
if not _installed_entry_point():
    register()
