/**
 * The format registry: every driver `openImage` knows, in probing order
 * (formats with a magic number first; raw is the fallback).
 * @module
 */
import type { FormatEntry } from "./open_image.ts";
import { AIO_FORMAT, SYNC_FORMAT } from "./raw/raw.ts";

export const FORMATS: FormatEntry[] = [
  AIO_FORMAT,
  SYNC_FORMAT,
];
