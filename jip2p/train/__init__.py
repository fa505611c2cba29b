"""InstructPix2Pix training: configs, the sharded jitted step, the loop, checkpoints and metrics.

One concern per file: `config` (the schema every config file starts from, its checks, and the
copy a run saves in its work directory), `distributed` (joining a multi-host run), `sharding`
(mesh and path → PartitionSpec rules), `models` (the models a run starts from, and the frozen ones
its step runs), `step` (the pure train step), `input` (batches per host), `checkpointing` (orbax),
`metrics` and `events` (TensorBoard, FLOPs, MFU, the step's loss bookkeeping), `evaluate` (the
validation image grid), `export` (the diffusers folders a run writes) and `loop` (which wires
them, top to bottom).
"""
