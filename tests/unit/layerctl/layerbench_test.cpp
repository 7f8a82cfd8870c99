// layerbench's pieces that stand alone: generated tar layers (read back with libarchive) and
// latency percentiles.
#include <archive.h>
#include <archive_entry.h>

#include <gtest/gtest.h>

#include <string>

#include "runner.hpp"
#include "tar_stream.hpp"

using namespace layerbench;

namespace {

std::string drain(TarStream stream, std::size_t piece) {
  std::string out;
  std::string buf(piece, '\0');
  while (std::size_t n = stream.read(buf.data(), buf.size())) out.append(buf.data(), n);
  return out;
}

}  // namespace

TEST(TarStream, SmallFilesReadBackWithLibarchive) {
  TarStream stream = TarStream::small_files(50, 700);
  std::uint64_t expected_total = stream.total_size();
  // The same bytes whatever the read size.
  std::string tar = drain(TarStream::small_files(50, 700), 4096);
  EXPECT_EQ(drain(TarStream::small_files(50, 700), 333), tar);
  EXPECT_EQ(tar.size(), expected_total);
  EXPECT_EQ(tar.size() % 512, 0u);

  archive* a = archive_read_new();
  archive_read_support_format_tar(a);
  ASSERT_EQ(archive_read_open_memory(a, tar.data(), tar.size()), ARCHIVE_OK);
  archive_entry* entry = nullptr;
  int files = 0;
  int dirs = 0;
  while (archive_read_next_header(a, &entry) == ARCHIVE_OK) {
    if (archive_entry_filetype(entry) == AE_IFDIR) {
      ++dirs;
      EXPECT_STREQ(archive_entry_pathname(entry), "files/");
      continue;
    }
    EXPECT_EQ(archive_entry_size(entry), 700);
    std::string data(700, '\0');
    EXPECT_EQ(archive_read_data(a, data.data(), data.size()), 700);
    EXPECT_EQ(data[0], 'a');
    ++files;
  }
  EXPECT_EQ(files, 50);
  EXPECT_EQ(dirs, 1);
  archive_read_free(a);
}

TEST(TarStream, BigFileSizeAndLongNames) {
  TarStream big = TarStream::big_file(10 * 1024 * 1024 + 3);
  EXPECT_EQ(big.total_size(), 512 + 10 * 1024 * 1024 + 512 + 1024);
  EXPECT_EQ(drain(std::move(big), 1 << 20).size(), 512u + 10 * 1024 * 1024 + 512 + 1024);

  std::string dir(120, 'd');
  TarStream named({{dir + "/file", 1, false}});
  std::string tar = drain(std::move(named), 512);
  archive* a = archive_read_new();
  archive_read_support_format_tar(a);
  ASSERT_EQ(archive_read_open_memory(a, tar.data(), tar.size()), ARCHIVE_OK);
  archive_entry* entry = nullptr;
  ASSERT_EQ(archive_read_next_header(a, &entry), ARCHIVE_OK);
  EXPECT_EQ(std::string(archive_entry_pathname(entry)), dir + "/file");
  archive_read_free(a);
}

TEST(Latencies, NearestRankPercentiles) {
  Latencies l;
  for (int i = 1; i <= 100; ++i) l.add(i);
  EXPECT_EQ(l.percentile(50), 50);
  EXPECT_EQ(l.percentile(90), 90);
  EXPECT_EQ(l.percentile(99), 99);
  EXPECT_EQ(l.percentile(100), 100);
  EXPECT_EQ(l.summary()["count"], 100);
  Latencies empty;
  EXPECT_EQ(empty.percentile(99), 0);
}
