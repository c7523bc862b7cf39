"""mathrl: post-train language models to solve math problems."""
