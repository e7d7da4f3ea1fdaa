"""The attention backends' names, without importing torch: the config validates ``model.attn_backend`` and
``model.temporal_attn_backend`` against these, ``kernels/attention.py`` dispatches on them."""

BACKENDS = ("auto", "flash", "efficient", "cudnn", "math", "naive")  # SDPA pinned to one kernel, or the explicit one
SHORT_SEQUENCE_BACKENDS = ("triton",)  # attention within runs of seq_len tokens only (divided attention's temporal pass)
