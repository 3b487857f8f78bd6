"""HTTP routes: each translates between the wire and `ServerState`/`Hub`, nothing more."""
