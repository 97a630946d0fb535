"""Process set-up shared by the model-loading tools (convert, eval): quiet expected notices.

Import-time notices from megatron-core (no TE/apex on CPU) and torch's ShardedTensor /
all_gather deprecations inside dist_checkpointing are expected on every run of these tools and
would bury their progress output; they are filtered by message, nothing else is.
"""

from __future__ import annotations

import os
import warnings

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
