"""The system of record that api and worker share: settings, database, queue, artifacts."""
