"""diskflow: VM disk images into Kubernetes volumes, and the golden images built first."""
