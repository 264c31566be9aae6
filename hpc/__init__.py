"""Everything about the cluster: Slurm, Ray inside an allocation, network, the local test cluster."""
