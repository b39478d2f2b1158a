"""Typed application state (aiohttp ``web.AppKey``), in one place."""

from __future__ import annotations

from aiohttp import web

from terra.config import Config
from terra.live import LiveService
from terra.metrics import Metrics
from terra.recognizer.scheduler import RecognizerScheduler
from terra.recognizer.types import RecognitionEngine
from terra.spool import Spool

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
SPOOL = web.AppKey("spool", Spool)
ENGINE = web.AppKey("engine", RecognitionEngine)
SCHEDULER = web.AppKey("scheduler", RecognizerScheduler)
LIVE = web.AppKey("live", LiveService)
