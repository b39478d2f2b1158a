"""Typed application state (aiohttp ``web.AppKey``), in one place."""

from __future__ import annotations

import asyncio

from aiohttp import web

from terra.config import Config
from terra.feed import FeedHub
from terra.live import LiveService
from terra.metrics import Metrics
from terra.minutes.service import MinutesService
from terra.recognizer.backend import Recognizer
from terra.recognizer.options import DecodePasses
from terra.recognizer.types import Vocabulary
from terra.spool import Spool
from terra.translate.service import TranslationService

CONFIG = web.AppKey("config", Config)
DECODE = web.AppKey("decode", DecodePasses)  # each kind of pass's DecodeOptions
METRICS = web.AppKey("metrics", Metrics)
SPOOL = web.AppKey("spool", Spool)
# The start-up removal of temp files killed writers left in the spool, in the background.
SPOOL_TEMPS: web.AppKey[asyncio.Task[int]] = web.AppKey("spool_temps")
ENGINE = web.AppKey("engine", Vocabulary)  # the model's tokens (recognition: SCHEDULER)
SCHEDULER = web.AppKey("scheduler", Recognizer)  # local scheduler or the Ray backend
LIVE = web.AppKey("live", LiveService)
FEED = web.AppKey("feed", FeedHub)  # what viewers of each conference see
MINUTES = web.AppKey("minutes", MinutesService)
# Present only while a translator is enabled and configured (else /translate_to_any is 404).
TRANSLATION = web.AppKey("translation", TranslationService)
