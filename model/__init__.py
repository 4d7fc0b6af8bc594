"""model/: a hand-written Llama with a swappable head, its tokenizer and checkpoints."""
from .config import PRESETS, LlamaConfig, get_preset
from .llama import Llama
from .tokenizer import Tokenizer
from .checkpoint import CheckpointError, export_hf, load_checkpoint, load_model, save_checkpoint
from .files import read_tokenizer
