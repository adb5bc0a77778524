"""Command line: `generate` calls Triton directly; `weapon` forges a weapon through the
gateway; `keys create|revoke|list` manages API keys."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
from redis.exceptions import RedisError

from gateway.content_policy import MODES
from gateway.triton_client import ImageParams, ModelError, generate


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    params = ImageParams(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
    )
    url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
    (image,) = generate(url, [params], protocol=args.protocol)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.pixels).save(args.out)
    print(f"{args.out} seed={image.seed} size={image.pixels.shape[1]}x{image.pixels.shape[0]}")
    return 0


def _weapon(args: argparse.Namespace) -> int:
    """A weapon through the gateway (the public API), saved as the image it returns."""
    key = args.key or args.key_file.read_text().strip()
    body = {
        k: v
        for k, v in {
            "weapon_type": args.weapon_type,
            "material": args.material,
            "element": args.element,
            "rarity": args.rarity,
            "look": args.look,
            "style": args.style,
            "text": args.text,
            "seed": args.seed,
            "steps": args.steps,
        }.items()
        if v is not None
    }
    reply = httpx.post(
        f"{args.url}/v1/weapons",
        json=body,
        timeout=300,
        headers={"Authorization": f"Bearer {key}", "Accept": "image/png"},
    )
    if reply.status_code != 200:
        print(f"error: {reply.status_code} {reply.text}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(reply.content)
    print(f"{args.out} seed={reply.headers['X-Seed']} asset={reply.headers['Content-Location']}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    """API keys straight in Redis (FORGE_REDIS_URL): for operators, before any admin key exists."""
    import asyncio
    import json

    from redis.asyncio import Redis

    from gateway.keys import KeyStore
    from gateway.settings import Settings

    async def run() -> int:
        redis = Redis.from_url(Settings().redis_url)
        store = KeyStore(redis)
        try:
            if args.action == "create":
                expires = (
                    time.time() + args.expires_in_days * 86_400 if args.expires_in_days else None
                )
                secret, record = await store.create(
                    args.name,
                    tuple(args.scopes),
                    args.tier,
                    expires_at=expires,
                    content_policy=args.content_policy,
                )
                made = {"key": secret, "webhook_secret": record.webhook_secrets[0]}
                print(json.dumps({**record.public(), **made}))
            elif args.action == "revoke":
                if not await store.revoke(args.id):
                    print(f"error: no API key {args.id}", file=sys.stderr)
                    return 1
                print(f"revoked {args.id}")
            elif args.action == "rotate-webhook-secret":
                settings = Settings()
                new = await store.rotate_webhook_secret(args.id, settings.webhook_secret_overlap_s)
                if new is None:
                    print(f"error: no API key {args.id}", file=sys.stderr)
                    return 1
                print(json.dumps({"id": args.id, "webhook_secret": new}))
            else:
                for key in await store.list():
                    print(json.dumps(key))
            return 0
        finally:
            await redis.aclose()

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m gateway.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="call Triton's stable_diffusion model, write a PNG")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--scheduler")
    gen.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    gen.add_argument("--url", help="host:port (default: the local Triton's port for the protocol)")
    gen.add_argument("--out", type=Path, default=Path("weapon.png"))
    gen.set_defaults(func=_generate)

    weapon = sub.add_parser("weapon", help="forge a weapon through the gateway, write the PNG")
    weapon.add_argument("--weapon-type", required=True)
    weapon.add_argument("--material", required=True)
    weapon.add_argument("--element")
    weapon.add_argument("--rarity")
    weapon.add_argument("--look")
    weapon.add_argument("--style", help="a studio style the model serves")
    weapon.add_argument("--text")
    weapon.add_argument("--seed", type=int)
    weapon.add_argument("--steps", type=int)
    weapon.add_argument("--url", default="http://127.0.0.1:8080")
    weapon.add_argument("--key", help="API key (default: read --key-file)")
    weapon.add_argument("--key-file", type=Path, default=Path("var/run/dev-api-key"))
    weapon.add_argument("--out", type=Path, default=Path("weapon.png"))
    weapon.set_defaults(func=_weapon)

    keys = sub.add_parser("keys", help="create, revoke or list API keys (in FORGE_REDIS_URL)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="print a new key once, with its record")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", nargs="+", choices=["generate", "admin"], default=["generate"])
    create.add_argument("--tier", choices=["priority", "standard", "bulk"], default="standard")
    create.add_argument("--expires-in-days", type=int, help="the key stops working after")
    create.add_argument(
        "--content-policy",
        choices=MODES,
        default="strict",
        help="players' blocked text: strict refuses it, review flags it, off does not check",
    )
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id")
    actions.add_parser("list", help="every key's id, name, scopes, tier, state and last use")
    rotate = actions.add_parser(
        "rotate-webhook-secret",
        help="print a new webhook secret; the previous one signs too for a while",
    )
    rotate.add_argument("id")
    keys.set_defaults(func=_keys)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ModelError, OSError, RedisError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
