"""What a run asks of a cluster and whether the cluster has it: the component layout (GPUs, CPUs), the host
shared-memory and storage models, the resource check, experiment runs as Ray tasks, and returning freed heap
memory to the OS (`heap.py`). `python -m piplay_ray.cluster.layout CONFIG` prints the layout as JSON."""
