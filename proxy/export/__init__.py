"""Usage ledger exporters (docs/usage.md, "Exporters"): drain every account's ledger stream through a consumer
group into a sink, at least once, acknowledging only what the sink confirmed."""
