"""What `kvcache up` runs on the real model: its workloads as data (texts under `texts/`)."""
