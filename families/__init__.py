"""Model families, one folder each: a family's config, weights map, model, sampling rule and
runner live in `families/<name>/`, above the scheduler whose interfaces they implement and on
top of the layers `model/` shares (docs/architecture.md, "Adding a family")."""
