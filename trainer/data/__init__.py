"""Data: loading files and Hub datasets, batching, the global sample order, the embedded demo data."""
