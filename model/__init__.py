"""model/: a hand-written Llama with a swappable head, its tokenizer and checkpoints."""
from .config import PRESETS, LlamaConfig, get_preset
from .llama import Llama
from .tokenizer import Tokenizer

try:  # written in a separate step; the trunk and tokenizer do not depend on it
    from .checkpoint import CheckpointError, export_hf, load_checkpoint, load_model, save_checkpoint
except ImportError:  # pragma: no cover
    pass
