"""Planning at scale: FLOPs, devices, step time, calibration against published runs, layout search.

Dependencies point one way: ``devices`` and ``flops`` stand alone; ``timing``
reads them and the memory plan (:mod:`zeromega.plugins.zero.plan`);
``calibration`` and ``search`` read ``timing``.
"""
