"""Cron scheduler: fires the daily and weekly jobs, one run at a time."""
