"""The command lines zeromega writes for other tools, as data (:mod:`.megatron_lm`, :mod:`.megatron_deepspeed`)."""
