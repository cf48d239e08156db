"""edgepipe runtime: config, clock, events, bindings, worker loop, HTTP app and CLI."""
