"""InstructPix2Pix training: configs, the sharded jitted step, the loop, checkpoints and metrics.

One concern per file: `config` (the schema every config file starts from, and its checks),
`distributed` (joining a multi-host run, agreeing on a step to save at when preempted),
`sharding` (mesh and path → PartitionSpec rules), `step` (the pure train step), `input` (batches
per host), `checkpointing` (orbax), `metrics` and `events` (TensorBoard, FLOPs, MFU, train.log),
`profiler` (a trace of a few steps), `evaluate` (the validation image grid), `exporting` (the models
a run starts from and the diffusers folders it writes) and `loop` (which wires them, top to
bottom).
"""
