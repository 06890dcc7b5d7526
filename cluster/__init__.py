"""Everything that talks to a Ray cluster: Ray Train runs (and later Ray Jobs), imported lazily."""
