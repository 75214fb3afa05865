"""Getting bytes into memory safely: base model, module injection, adapter files, the adapter registry."""
