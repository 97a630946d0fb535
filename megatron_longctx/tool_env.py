"""Process set-up shared by the model-loading tools (convert, eval): quiet expected notices,
and the one way they report bad input.

Import-time notices from megatron-core (no TE/apex on CPU) and torch's ShardedTensor /
all_gather deprecations inside dist_checkpointing are expected on every run of these tools and
would bury their progress output; they are filtered by message, nothing else is.

Bad input (flags, a damaged checkpoint: `CheckpointError`, a strict-loading failure of an HF
directory: `ConversionError`, a damaged dataset: `DatasetError`; all ValueErrors whose message
starts with the file) ends in `tool_error`: one line `TOOL: error: FILE: what` on stderr and
exit code 2, no traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_EXPECTED = (
    r".*(Transformer Engine and )?Apex (is|are) not installed.*",
    r".*deprecating ShardedTensor.*",
    r".*`load_state_dict` is deprecated.*",
    r".*all_gather_into_tensor` is deprecated.*",
)


def quiet_tool_warnings() -> None:
    """Filter the expected notices; keep HF tokenizers single-threaded per process."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for pattern in _EXPECTED:
        warnings.filterwarnings("ignore", message=pattern)


def tool_error(error: BaseException | str, tool: str | None = None) -> int:
    """Print `error` as one line `TOOL: error: MESSAGE` on stderr; returns exit code 2.

    Args:
        error: the exception (its message names the file) or a message.
        tool: the tool's name; default the running script's file name.
    """
    name = tool or Path(sys.argv[0]).name or "tool"
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{name}: error: {message}", file=sys.stderr, flush=True)
    return 2
