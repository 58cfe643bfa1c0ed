"""`device-sim stub ca|group|enroll|registration|status|faults ...`: manage the emulator's CA
certificates, enrollments and registration records through its service API, and show what
it holds."""

from __future__ import annotations

import argparse
import json

from device_sim.cli.durations import human_duration
from device_sim.cli.options import add_home_argument, existing_home
from device_sim.common.errors import UserError

RECORD_KINDS = {"group": "enrollmentGroups", "enroll": "enrollments"}
ALLOCATION_CHOICES = ("hashed", "geoLatency", "static", "custom")


def add_admin(verbs) -> None:
    _add_ca(verbs)
    _add_record_commands(verbs, "group", "enrollment groups (X.509 CA or signing certificate)")
    _add_record_commands(verbs, "enroll", "individual enrollments (a device's leaf certificate)")
    _add_registration(verbs)
    _add_status(verbs)
    _add_faults(verbs)


# --------------------------------------------------------------------------- admin commands


def _admin_parser(verbs, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = verbs.add_parser(name, help=help_text, description=help_text)
    add_home_argument(parser)
    parser.add_argument("--service-url", help="service API URL (default: from <home>/stub/endpoint.json)")
    parser.add_argument("--json", action="store_true", help="print the service's JSON answer")
    return parser


def _client(args):
    from device_sim.stub import admin

    home = existing_home(args.home, hint="no emulator ran there: start one with "
                         "`device-sim stub serve --home DIR`", exit_code=admin.EXIT_UNREACHABLE)
    endpoint = admin.find_endpoint(home, args.service_url)
    return admin.ServiceClient(endpoint)


def _emit(args, result, text: str) -> int:
    if args.json:
        print(json.dumps(result, indent=None if result is None else 2))
    else:
        print(text)
    return 0


def _add_ca(verbs) -> None:
    ca = verbs.add_parser("ca", help="CA certificates: upload, proof of possession, list, delete",
                          description="Root/intermediate CA certificates an enrollment group can reference.")
    sub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    p = _admin_parser(sub, "upload", "upload a CA certificate (unverified unless --verified)")
    p.add_argument("name", help="certificate name (letters, digits, - . _)")
    p.add_argument("file", help="PEM or DER certificate file (the first certificate is used)")
    p.add_argument("--verified", action="store_true", help="mark verified on upload (no proof of possession)")
    p.set_defaults(func=_ca_upload)
    p = _admin_parser(sub, "code", "print a verification code for the proof of possession")
    p.add_argument("name")
    p.set_defaults(func=_ca_code)
    p = _admin_parser(sub, "verify", "upload the verification certificate (CN = code, signed by the CA key)")
    p.add_argument("name")
    p.add_argument("file", help="verification certificate file (PEM or DER)")
    p.set_defaults(func=_ca_verify)
    p = _admin_parser(sub, "get", "show one CA certificate")
    p.add_argument("name")
    p.set_defaults(func=_ca_get)
    p = _admin_parser(sub, "list", "list CA certificates")
    p.set_defaults(func=_ca_list)
    p = _admin_parser(sub, "delete", "delete a CA certificate")
    p.add_argument("name")
    p.set_defaults(func=_ca_delete)


def _ca_summary(record: dict) -> str:
    props = (record or {}).get("properties", {})
    state = "verified" if props.get("isVerified") else "unverified"
    return f"{record.get('name', '?')}\t{state}\t{props.get('subject', '')}"


def _ca_upload(args) -> int:
    from device_sim.stub.admin import read_certificate_pem

    pem = read_certificate_pem(args.file)
    record = _client(args).ca_upload(args.name, pem, args.verified)
    return _emit(args, record, _ca_summary(record))


def _ca_code(args) -> int:
    record = _client(args).ca_code(args.name)
    code = (record or {}).get("properties", {}).get("verificationCode")
    if not code:
        raise UserError(f"the service returned no verification code for {args.name}", exit_code=3)
    return _emit(args, record, code)


def _ca_verify(args) -> int:
    from device_sim.stub.admin import read_certificate_pem

    pem = read_certificate_pem(args.file)
    record = _client(args).ca_verify(args.name, pem)
    return _emit(args, record, _ca_summary(record))


def _ca_get(args) -> int:
    record = _client(args).ca_get(args.name)
    return _emit(args, record, _ca_summary(record))


def _ca_list(args) -> int:
    records = _client(args).ca_list()
    return _emit(args, records, "\n".join(_ca_summary(r) for r in records) or "(no CA certificates)")


def _ca_delete(args) -> int:
    _client(args).ca_delete(args.name)
    return _emit(args, None, f"deleted {args.name}")


def _add_record_commands(verbs, noun: str, help_text: str) -> None:
    parser = verbs.add_parser(noun, help=help_text, description=help_text)
    sub = parser.add_subparsers(dest=f"{noun}_command", required=True, metavar="ACTION")
    id_help = "enrollment group ID" if noun == "group" else "registration ID (the device leaf's CN)"
    p = _admin_parser(sub, "create", f"create or replace one of the {help_text.split(' (')[0]}")
    p.add_argument("id", help=id_help)
    if noun == "group":
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--ca-ref", metavar="NAME", help="name of an uploaded CA certificate")
        source.add_argument("--cert", metavar="FILE", help="signing certificate file (PEM or DER)")
    else:
        p.add_argument("--cert", metavar="FILE", required=True, help="the device's leaf certificate (PEM or DER)")
        p.add_argument("--device-id", help="IoT Hub device ID (default: the registration ID)")
    p.add_argument("--disabled", action="store_true", help="create it disabled")
    p.add_argument("--hub", action="append", default=[], metavar="HOST", help="restrict to these linked hubs")
    p.add_argument("--allocation", choices=ALLOCATION_CHOICES,
                   help="allocation policy (default: the emulator's, hashed); custom calls --webhook-url")
    p.add_argument("--webhook-url", metavar="URL",
                   help="custom allocation webhook (http:// or https://) the emulator POSTs each registration to")
    p.add_argument("--webhook-api-version", metavar="V",
                   help="customAllocationDefinition.apiVersion (default 2021-10-01)")
    p.add_argument("--credential-policy", metavar="NAME",
                   help="credentialPolicyName: devices sending a csr get a certificate from this policy "
                        "(the emulator has 'default')")
    p.set_defaults(func=_record_create, noun=noun)
    for action, text in (("get", "show one"), ("delete", "delete one"), ("enable", "enable one"),
                         ("disable", "disable one")):
        p = _admin_parser(sub, action, f"{text} ({id_help})")
        p.add_argument("id", help=id_help)
        p.set_defaults(func=_record_action, noun=noun, action=action)
    p = _admin_parser(sub, "list", "list all")
    p.set_defaults(func=_record_list, noun=noun)


def _record_summary(noun: str, record: dict) -> str:
    record = record or {}
    record_id = record.get("enrollmentGroupId") if noun == "group" else record.get("registrationId")
    return f"{record_id}\t{record.get('provisioningStatus', 'enabled')}"


def _record_create(args) -> int:
    from device_sim.stub import admin

    allocation = admin.allocation_fields(*_allocation_options(args))
    cert = admin.read_certificate_pem(args.cert) if args.cert else None
    if args.noun == "group":
        record = admin.group_record(args.id, args.ca_ref, cert, args.disabled, args.hub, allocation)
    else:
        record = admin.enrollment_record(args.id, cert, args.device_id, args.disabled, args.hub, allocation)
    if args.credential_policy:
        record["credentialPolicyName"] = args.credential_policy
    result = _client(args).put_record(RECORD_KINDS[args.noun], args.id, record)
    return _emit(args, result, _record_summary(args.noun, result))


def _allocation_options(args) -> tuple[str | None, str | None, str | None]:
    custom = args.allocation == "custom"
    if custom and not args.webhook_url:
        raise UserError("--allocation custom needs --webhook-url URL (the webhook the emulator calls)")
    if not custom and (args.webhook_url or args.webhook_api_version):
        raise UserError("--webhook-url and --webhook-api-version belong to --allocation custom")
    return args.allocation, args.webhook_url, args.webhook_api_version


def _record_action(args) -> int:
    client = _client(args)
    kind = RECORD_KINDS[args.noun]
    if args.action == "get":
        result = client.get_record(kind, args.id)
    elif args.action == "delete":
        client.delete_record(kind, args.id)
        return _emit(args, None, f"deleted {args.id}")
    else:
        result = client.set_provisioning_status(kind, args.id, args.action + "d")
    return _emit(args, result, _record_summary(args.noun, result))


def _record_list(args) -> int:
    records = _client(args).list_records(RECORD_KINDS[args.noun])
    text = "\n".join(_record_summary(args.noun, r) for r in records) or "(none)"
    return _emit(args, records, text)


def _add_registration(verbs) -> None:
    parser = verbs.add_parser("registration", help="registration records the emulator made",
                              description="Registration records (created when a device registers).")
    sub = parser.add_subparsers(dest="registration_command", required=True, metavar="ACTION")
    for action in ("get", "delete"):
        p = _admin_parser(sub, action, f"{action} one registration record")
        p.add_argument("id", help="registration ID")
        p.set_defaults(func=_registration_action, action=action)
    p = _admin_parser(sub, "list", "list registration records (all, or one enrollment group's)")
    p.add_argument("--group", metavar="ID", help="only the records of this enrollment group")
    p.set_defaults(func=_registration_list)


def _registration_summary(record: dict) -> str:
    return (f"{record.get('registrationId')}\t{record.get('status')}\t"
            f"{record.get('assignedHub', '')}\t{record.get('deviceId', '')}")


def _registration_action(args) -> int:
    client = _client(args)
    if args.action == "delete":
        client.registration_delete(args.id)
        return _emit(args, None, f"deleted {args.id}")
    record = client.registration_get(args.id)
    return _emit(args, record, _registration_summary(record))


def _registration_list(args) -> int:
    records = _client(args).registration_list(args.group)
    text = "\n".join(_registration_summary(r) for r in records) or "(no registration records)"
    return _emit(args, records, text)


def _add_status(verbs) -> None:
    p = _admin_parser(verbs, "status", "what the running emulator holds: CA certificates, "
                      "enrollments, registrations, hubs")
    p.set_defaults(func=_status)


def _status_text(status: dict) -> str:
    cas = status.get("certificates", {})
    registrations = status.get("registrations", {})
    by_status = ", ".join(f"{n} {name}" for name, n in sorted(registrations.get("byStatus", {}).items()))
    lines = [
        f"id scope\t{status.get('idScope', '')}",
        f"CA certificates\t{cas.get('total', 0)} ({cas.get('verified', 0)} verified)",
        f"enrollment groups\t{status.get('enrollmentGroups', 0)}",
        f"individual enrollments\t{status.get('enrollments', 0)}",
        f"registrations\t{registrations.get('total', 0)}" + (f" ({by_status})" if by_status else ""),
    ]
    for hub in status.get("hubs", []):
        lines.append(f"hub\t{hub.get('name')}\tweight {hub.get('weight')}\t"
                     f"{hub.get('assignedRegistrations', 0)} assigned")
    if status.get("quotaUnits"):
        lines.append(f"quota units\t{status['quotaUnits']}")
    if status.get("faults"):
        lines.extend(_fault_lines(status["faults"]))
    for name, value in (status.get("server") or {}).items():
        if name == "workers" and isinstance(value, list):
            lines.extend(_worker_line(worker) for worker in value)
            continue
        if name.endswith("Seconds") and isinstance(value, (int, float)):
            name, value = name.removesuffix("Seconds"), human_duration(value)
        lines.append(f"{name}\t{value}")
    return "\n".join(lines)


def _worker_line(worker: dict) -> str:
    """One line per `stub serve --workers` process: its pid and connections taken per port."""
    connections = ", ".join(f"{port} {n}" for port, n in (worker.get("connections") or {}).items())
    return f"worker {worker.get('index')}\tpid {worker.get('pid')}" + (f"\tconnections: {connections}" if connections else "")


def _status(args) -> int:
    status = _client(args).status()
    return _emit(args, status, _status_text(status))


def _add_faults(verbs) -> None:
    parser = verbs.add_parser("faults", help="the live fault plan: show, set, clear",
                              description="The running emulator's fault plan (docs/emulator.md, "
                                          "'Fault plans'); a change applies to new requests at once.")
    sub = parser.add_subparsers(dest="faults_command", required=True, metavar="ACTION")
    p = _admin_parser(sub, "show", "show the plan and the counters of its rules")
    p.set_defaults(func=_faults_show)
    p = _admin_parser(sub, "set", "replace the plan (counters and windows start again)")
    p.add_argument("file", help="fault plan JSON file")
    p.set_defaults(func=_faults_set)
    p = _admin_parser(sub, "clear", "remove the plan: no more faults")
    p.set_defaults(func=_faults_clear)


def _fault_lines(report: dict) -> list[str]:
    lines = [f"fault plan\tseed {report.get('seed')}, {len(report.get('rules', []))} rule(s), "
             f"started {report.get('startedUtc')}"]
    for rule in report.get("rules", []):
        lines.append(f"rule {rule.get('index')}\tmatched {rule.get('matched', 0)}\tfired {rule.get('fired', 0)}\t"
                     f"{json.dumps(rule.get('match', {}))} -> {json.dumps(rule.get('action', {}))}")
    return lines


def _faults_show(args) -> int:
    report = _client(args).faults_show()
    return _emit(args, report, "\n".join(_fault_lines(report)) if report else "(no fault plan)")


def _faults_set(args) -> int:
    from device_sim.stub.admin import read_fault_plan

    report = _client(args).faults_set(read_fault_plan(args.file))
    return _emit(args, report, "\n".join(_fault_lines(report or {})))


def _faults_clear(args) -> int:
    _client(args).faults_clear()
    return _emit(args, None, "fault plan cleared")
