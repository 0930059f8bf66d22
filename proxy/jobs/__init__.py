"""Jobs that outlive the connection: long-running generations (video, queued images) submitted to a provider's
queue, driven by whichever replica holds the job's lease, billed from the provider's units (docs/architecture.md)."""
