"""The application factory: wiring, cleanup contexts and the operational routes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from terra import keys
from terra.api import connecte as connecte_api
from terra.api import docs as docs_api
from terra.api import minutes as minutes_api
from terra.api import salute as salute_api
from terra.api import terra as terra_api
from terra.api import translate as translate_api
from terra.api import viewer as viewer_api
from terra.api.auth import require_metrics_access
from terra.api.errors import Handler, error_middleware
from terra.config import Config
from terra.feed import FeedHub
from terra.live import LiveService
from terra.metrics import create_metrics
from terra.models import resolve_model
from terra.recognizer.backend import Recognizer
from terra.recognizer.engine import WhisperEngine, load_whisper
from terra.recognizer.naive import NaiveEngine
from terra.recognizer.options import decode_passes, engine_settings
from terra.recognizer.scheduler import RecognizerScheduler
from terra.recognizer.types import RecognitionEngine, Vocabulary
from terra.recognizer.vocabulary import load_vocabulary
from terra.spool import Spool
from terra.tasks import cancel_and_wait
from terra.translate.backends import open_translator
from terra.translate.langid import LanguageDetector
from terra.translate.service import TranslationService

log = logging.getLogger(__name__)


def model_path(config: Config) -> str:
    return resolve_model(
        config.model.name, Path(config.model.models_dir), allow_download=config.model.allow_download
    )


def build_engine(config: Config) -> RecognitionEngine:
    """Resolve and load the configured model (blocking: call it off the event loop)."""
    settings = engine_settings(config, model_path(config))
    started = time.perf_counter()
    model = load_whisper(settings)
    log.info(
        "model %s loaded from %s in %.1f s",
        config.model.name,
        settings.model_path,
        time.perf_counter() - started,
    )
    if config.recognizer.mode == "naive":
        return NaiveEngine(model)
    return WhisperEngine(model, settings)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[keys.METRICS]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    started = time.perf_counter()
    response = await handler(request)
    metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
    metrics.requests.labels(route, str(response.status)).inc()
    return response


async def healthz(request: web.Request) -> web.Response:
    """Up, and how loaded: 503 with ``saturated: true`` when the box should take no new
    conferences (a load balancer's check)."""
    app = request.app
    scheduler = app[keys.SCHEDULER]
    snapshot = app[keys.LIVE].snapshot()
    return web.json_response(
        {
            "status": "ok",
            "model": app[keys.CONFIG].model.name,
            "recognizer_queue_depth": scheduler.depth,
            "owed_final_audio_s": round(scheduler.owed_final_s, 1),
            **snapshot,
        },
        status=503 if snapshot["saturated"] else 200,
    )


async def metrics(request: web.Request) -> web.Response:
    require_metrics_access(request)
    body = request.app[keys.METRICS].render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def create_app(config: Config, engine: RecognitionEngine | None = None) -> web.Application:
    """Build the server. ``engine`` lets tests and benchmarks share one loaded model."""
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware],
        client_max_size=config.server.max_upload_bytes + 64 * 1024,
    )
    app[keys.CONFIG] = config
    app[keys.DECODE] = decode_passes(config)
    app[keys.METRICS] = create_metrics()
    app[keys.SPOOL] = Spool(Path(config.spool.dir), fsync=config.spool.fsync)
    app[keys.FEED] = FeedHub(config.feed)
    app.cleanup_ctx.append(_stale_spool_temps_ctx)
    app.cleanup_ctx.append(_translation_ctx)
    app.cleanup_ctx.append(_recognizer_ctx(engine))
    app.cleanup_ctx.append(minutes_api.minutes_ctx)
    app.cleanup_ctx.append(salute_api.salute_ctx)
    app.cleanup_ctx.append(connecte_api.connecte_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    terra_api.add_routes(app)
    minutes_api.add_routes(app)
    translate_api.add_routes(app)
    salute_api.add_routes(app)
    connecte_api.add_routes(app)
    docs_api.add_routes(app)
    viewer_api.add_routes(app)
    return app


async def _stale_spool_temps_ctx(app: web.Application) -> AsyncIterator[None]:
    """Remove the spool's temp files left by writers killed between their write and rename,
    in the background: a spool of years of conferences takes a while to walk, and the
    server answers meanwhile (the younger temp files it writes are never touched)."""
    spool = app[keys.SPOOL]

    async def remove() -> int:
        removed = await asyncio.to_thread(spool.remove_stale_temps, time.time())
        if removed:
            log.info("spool: %d temp files left by killed writers removed", removed)
        return removed

    task = app[keys.SPOOL_TEMPS] = asyncio.create_task(remove(), name="spool-temps")
    yield
    await cancel_and_wait([task])


def _recognizer_ctx(
    engine: RecognitionEngine | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        config = app[keys.CONFIG]
        vocabulary: Vocabulary
        scheduler: Recognizer
        if config.recognizer.backend == "ray":  # the model runs on the cluster
            from terra.recognizer.ray_client import RayRecognizer, connect

            vocabulary = (
                engine
                if engine is not None
                else await asyncio.to_thread(lambda: load_vocabulary(Path(model_path(config))))
            )
            handle = connect(config.cluster)  # blocking, once at start-up
            scheduler = RayRecognizer(handle, config.cluster, config.recognizer, app[keys.METRICS])
        else:
            loaded = engine if engine is not None else await asyncio.to_thread(build_engine, config)
            vocabulary = loaded
            scheduler = RecognizerScheduler(loaded, config.recognizer, app[keys.METRICS])
        app[keys.ENGINE] = vocabulary
        live = LiveService(
            config.stream,
            config.recognizer,
            app[keys.DECODE],
            scheduler,
            app[keys.SPOOL],
            app[keys.METRICS],
            vocabulary,
            listener=app[keys.FEED],
        )
        app[keys.SCHEDULER] = scheduler
        app[keys.LIVE] = live
        app[keys.METRICS].saturated.set_function(lambda: float(live.saturated))
        await scheduler.start()
        await live.start()
        yield
        await live.stop()
        await scheduler.stop()

    return context


async def _translation_ctx(app: web.Application) -> AsyncIterator[None]:
    """The translator and the language detector, loaded once, when translation is configured."""
    config = app[keys.CONFIG]
    translator = await open_translator(config.translate, Path(config.model.models_dir))
    if translator is None:
        log.info("translation is off (translate.enabled / USE_TRANSLATOR, url or models)")
        yield
        return
    try:
        detector = await asyncio.to_thread(LanguageDetector, config.translate.detect_min_score)
        app[keys.TRANSLATION] = TranslationService(translator, detector, config.translate)
        log.info(
            "translation on: %s backend, %s",
            config.translate.backend,
            ", ".join(f"{s}->{t}" for s, t in sorted(translator.directions())),
        )
        yield
    finally:
        await translator.close()
