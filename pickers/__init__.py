"""The scheduling framework: admission, profiles, filters, scorers, pickers and their data layer."""
