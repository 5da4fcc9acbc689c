"""Tensor and expert parallel inference on torch.distributed: the model split over processes after it is built
(:mod:`~mmx.parallel.sharding`), each rank loading only its slices (:mod:`~mmx.parallel.loading`), the engine in
rank 0 sending every step to the others (:mod:`~mmx.parallel.workers`)."""
