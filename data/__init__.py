"""data/: preference records, the length policy, batch layouts, splits, and the built-in world.

    files / builtin ─> PrefRecord ─> encode_records (tokens, keep-the-end) ─> EncodedPrompt
                    ─> plan_batches, make_batch (padded | shared-prefix packed) ─> Batch
"""
from . import builtin
from .batch import LAYOUTS, Batch, make_batch, plan_batches, shard
from .encode import EncodedPrompt, EncodeStats, encode_records
from .records import (MARGIN_MODES, RATING_MARGINS, RATINGS, DataError, LoadStats, PrefRecord,
                      load_records, margins_for, parse_data_spec, render_conversation)
from .split import DEFAULT_SPLIT, split_of, split_records
