"""Benchmarking d2seg against reference implementations, side by side in one process (see
``tools/benchmark.py`` and ``docs/benchmarks.md``).

* :mod:`.references`: the plain-PyTorch / torchvision / smp reference networks, plain detectron2;
* :mod:`.subjects`: one measurable "subject" per model (d2seg's Trainer, the references);
* :mod:`.measure`: synchronised timing, peak memory, machine description;
* :mod:`.harness`: cases, settings, the measurements, ratios, targets, the markdown report;
* :mod:`.scaling`: time and memory vs image size and batch, the largest batch that fits;
* :mod:`.presets`: the named runs (``--preset gpu-semantic`` ...).

Importing this package imports nothing heavy; import the sub-modules.
"""
