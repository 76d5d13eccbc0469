"""Member network, ensemble engine, second stage, bundles and results."""
