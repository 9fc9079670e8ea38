"""Image sources, header probe and cost model: the stage the sidecar bounds. Imports nothing of ours."""
