"""Megatron-Core, made device-agnostic and driven by zeromega's run config.

Importing this package silences upstream warnings that report an optional
dependency's absence or a deprecation zeromega cannot act on (apex and
TransformerEngine are optional by design); every other warning still shows.
"""

import warnings

for _message in (
    r"Apex is not installed",
    r"Transformer Engine and Apex are not installed",
    r"full scope is deprecated",
    r"torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor) is deprecated",
):
    warnings.filterwarnings("ignore", message=_message)
