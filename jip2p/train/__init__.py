"""InstructPix2Pix training: configs, the sharded jitted step, the loop, checkpoints and metrics.

One concern per file: `config` (the schema every config file starts from, its checks, and the
copy a run saves in its work directory), `distributed` (joining a multi-host run, agreeing on a
step to save at when preempted), `sharding` (mesh and path → PartitionSpec rules), `models` (the
models a run starts from, and the frozen ones its step runs), `step` (the pure train step),
`input` (batches per host), `checkpointing` (orbax), `metrics` and `events` (TensorBoard, FLOPs,
MFU, train.log, the step's loss bookkeeping), `profiler` (a trace of a few steps), `evaluate`
(the validation image grid), `exporting` (the diffusers folders a run writes) and `loop` (which
wires them, top to bottom).
"""
