"""Scale-up: the `train` launch (`launch`), the DDP / FSDP2 / ZeRO-3 backends and the placed teacher (`backends`),
exactly resumable checkpoints (`checkpoint`), the teacher-feature cache (`cache`), the benchmark and memory
estimates (`bench`) and run manifests (`manifest`). It plugs into the method's loop through its `Backend` protocol
and its callbacks; the method never imports it."""
