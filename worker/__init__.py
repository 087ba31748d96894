"""The worker: joins a coordinator, holds one pipeline stage, streams activations and gradients."""
