"""Applications on top of the library: the CLI, the digits demo, the launcher, docs rendering and the survey.
Nothing in the library imports them."""
